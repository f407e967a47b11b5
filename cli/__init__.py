"""The `bfq` command line (installed as the package `bfq_cli`)."""
