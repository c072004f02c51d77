from mazerun.cli import main

main()
