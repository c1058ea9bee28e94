"""``python -m maestro_train`` (installed) or ``python -m train`` (from a checkout)."""
from .main import cli

cli()
