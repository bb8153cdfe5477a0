from allmil_cli.cli.app import run

run()
