"""``python -m prerank``: the command line, also as ``torchrun --nproc-per-node N -m prerank train ...``."""

from prerank.cli import main

if __name__ == "__main__":
    main()
