from allmil_cli.cli import run

run()
