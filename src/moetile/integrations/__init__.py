"""Bridges to other libraries. Each submodule imports its library lazily (inside functions), so
``import moetile`` never imports them: ``moetile.integrations.transformers`` needs the extra
``moetile[transformers]``."""
