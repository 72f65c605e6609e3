"""The lowest layer: names, paths and constants every other layer shares (standard library only:
the Modal app files import it where only modal is installed)."""
