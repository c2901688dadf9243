"""python train.py [group=option ...] [key=value ...]: see README.md and `python train.py --help`."""

from kd_lightning.run.cli import main

if __name__ == "__main__":
    main()
