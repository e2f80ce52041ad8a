"""Click commands, one module per stage; each attaches its commands to `teranprep.cli.main`."""
