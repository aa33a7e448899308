"""`python -m idd_ops.demo`: the same command as `idd-distill` (idd_ops/demo/cli.py)."""
from .cli import main

if __name__ == "__main__":
    main()
