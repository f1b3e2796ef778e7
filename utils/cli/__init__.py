"""The command line: flags (:mod:`.options`), presets, and the adapters that turn parsed flags into
the typed configuration the library takes (:mod:`.adapters`).  Nothing below ``utils/run`` reads
an argparse Namespace."""
