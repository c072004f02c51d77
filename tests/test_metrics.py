from pathlib import Path

import pytest
from conftest import svg_polylines
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mazerun.training.linechart import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, nice_ticks, tick_label
from mazerun.training.metrics import MetricsLogger, copy_metrics_history, format_table, plot_curves, read_metrics_csv


def test_format_table_matches_maze_layout():
    table = format_table(96, [("train", "discrete_accuracy", 0.948), ("train", "status", "ok")])
    lines = table.splitlines()
    assert lines[0] == f" step|{'path':<72}|    value"
    assert lines[1] == f"=====|{'=' * 72}|========="
    assert lines[2] == f"   96|{'train     discrete_accuracy':<72}|    0.948"
    assert lines[3] == f"   96|{'train     status':<72}|       ok"
    assert len({len(line) for line in lines}) == 1
    assert [line.index("|") for line in lines] == [5] * 4


def test_numbers_print_with_four_significant_digits():
    rows = [("train", "learning_rate", 3e-4), ("train", "loss", 1.23456), ("eval", "mean_return", -191.2345),
            ("train", "sps", 5340.0), ("train", "tiny", 0.000012345678)]
    values = [line.rsplit("|", 1)[1].strip() for line in format_table(1, rows).splitlines()[2:]]
    assert values == ["0.0003", "1.235", "-191.2", "5340", "1.235e-05"]


def test_format_table_widens_columns_for_large_cells():
    table = format_table(1234567, [("eval", "x" * 80, 123456789.0)])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2] == f"1234567|eval      {'x' * 80}|1.235e+08"
    assert lines[0].startswith("   step|path")


def test_logger_writes_tensorboard_csv_and_console(tmp_path: Path):
    printed: list[str] = []
    with MetricsLogger(tmp_path, print_fn=printed.append) as logger:
        logger.log(1, {"loss": 0.5, "discrete_accuracy": 0.25}, group="train")
        logger.log(2, {"loss": 0.125}, group="train")
        logger.log(2, {"mean_return": -3.5}, group="eval")

    event_files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/discrete_accuracy", "eval/mean_return"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("eval/mean_return")] == [(2, -3.5)]

    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,group,metric,value,wall_seconds"
    assert read_metrics_csv(tmp_path / "metrics.csv") == [
        {"step": 1, "group": "train", "metric": "loss", "value": 0.5},
        {"step": 1, "group": "train", "metric": "discrete_accuracy", "value": 0.25},
        {"step": 2, "group": "train", "metric": "loss", "value": 0.125},
        {"step": 2, "group": "eval", "metric": "mean_return", "value": -3.5},
    ]

    assert len(printed) == 3
    assert printed[0] == format_table(1, [("train", "loss", 0.5), ("train", "discrete_accuracy", 0.25)])
    assert "   2|eval      mean_return" in printed[2]


def test_csv_is_complete_before_close_and_appended_on_resume(tmp_path: Path):
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False)
    logger.log(10, {"loss": 1.0}, group="train")
    # Readable while the logger is still open, as after a Ctrl-C.
    assert read_metrics_csv(tmp_path / "metrics.csv") == [
        {"step": 10, "group": "train", "metric": "loss", "value": 1.0}
    ]
    logger.close()
    logger.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))

    with MetricsLogger(tmp_path, tensorboard=False, console=False) as resumed:
        resumed.log(11, {"loss": 0.75}, group="train")
    text = (tmp_path / "metrics.csv").read_text()
    assert text.count("step,group,metric,value,wall_seconds") == 1
    assert [row["value"] for row in read_metrics_csv(tmp_path / "metrics.csv")] == [1.0, 0.75]


def test_console_false_prints_nothing(tmp_path: Path):
    printed: list[str] = []
    with MetricsLogger(tmp_path, tensorboard=False, console=False, print_fn=printed.append) as logger:
        logger.log(0, {"loss": 2.0}, group="train")
    assert printed == []
    assert read_metrics_csv(tmp_path / "metrics.csv")[0]["value"] == pytest.approx(2.0)


def test_wall_seconds_count_training_time_and_a_continued_run_counts_on_from_its_history(tmp_path: Path):
    earlier, continued = tmp_path / "earlier", tmp_path / "continued"
    earlier.mkdir()
    (earlier / "metrics.csv").write_text("step,group,metric,value,wall_seconds\n"
                                         "10,train,loss,1.0,100.0\n20,train,loss,0.5,200.0\n30,train,loss,0.25,300.0\n")
    copy_metrics_history(earlier, continued, up_to_step=20)  # the checkpoint was at step 20
    with MetricsLogger(continued, tensorboard=False, console=False) as logger:
        logger.log(30, {"loss": 0.3}, group="train")
        logger.log(40, {"loss": 0.2}, group="train")
    rows = read_metrics_csv(continued / "metrics.csv", wall_seconds=True)
    assert [(row["step"], row["wall_seconds"]) for row in rows[:2]] == [(10, 100.0), (20, 200.0)]
    times = [row["wall_seconds"] for row in rows[2:]]
    assert 200.0 <= times[0] <= times[1] < 260.0


def test_a_file_written_before_wall_seconds_reads_without_them(tmp_path: Path):
    (tmp_path / "metrics.csv").write_text("step,group,metric,value\n5,eval,mean_return,-3.5\n")
    assert read_metrics_csv(tmp_path / "metrics.csv", wall_seconds=True) == [
        {"step": 5, "group": "eval", "metric": "mean_return", "value": -3.5, "wall_seconds": None}]
    copy_metrics_history(tmp_path, tmp_path / "continued", up_to_step=5)
    assert (tmp_path / "continued" / "metrics.csv").read_text().splitlines() == [
        "step,group,metric,value,wall_seconds", "5,eval,mean_return,-3.5,"]


# ------------------------------------------------------------------------------------- learning curve


def test_nice_ticks_are_round_steps_that_cover_the_range() -> None:
    assert nice_ticks(0, 65536) == [0.0, 20000.0, 40000.0, 60000.0, 80000.0]
    assert nice_ticks(-397.1, -28.5) == [-400.0, -300.0, -200.0, -100.0, 0.0]
    assert nice_ticks(5.0, 5.0) == [4.0, 4.5, 5.0, 5.5, 6.0]  # one value: a unit either side
    assert [tick_label(value) for value in (60000.0, 1_500_000.0, 0.25, -100.0)] == ["60k", "1.5M", "0.25", "-100"]


def test_learning_curve_maps_points_onto_the_axes(tmp_path: Path) -> None:
    # evaluations at steps 0 and 100 with returns -100 and 0, and a diverged one that is left out
    plot_curves(tmp_path / "curve.svg", {"a": ([0, 100, 200], [-100.0, 0.0, float("nan")])}, "title <&>")
    [line] = svg_polylines(tmp_path / "curve.svg")
    # x ticks 0..100 span the plot's width (80 to 680 px), y ticks -100..0 its height (390 to 40 px)
    assert line == [(LEFT, HEIGHT - BOTTOM), (WIDTH - RIGHT, TOP)]
    assert "title &lt;&amp;&gt;" in (tmp_path / "curve.svg").read_text()
