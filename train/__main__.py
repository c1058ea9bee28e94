from train.main import cli

cli()
