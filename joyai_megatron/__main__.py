"""Command line: ``python -m joyai_megatron <command> ...``."""

from joyai_megatron.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
