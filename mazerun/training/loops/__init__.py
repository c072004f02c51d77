"""Training loops: offline (records), on-policy (PPO), interactive (DAgger) and off-policy (SAC).

Each takes a prepared :class:`mazerun.training.runsetup.RunSetup` and returns a
:class:`mazerun.training.runsetup.TrainResult`; none of them sets process-wide state (seeds, thread
counts), so several learners can share a process.
"""
