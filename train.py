"""`python train.py --config=configs/demo.py` in a checkout: the `secvit-train` command, whose
flags and help live in `secvit_jax/train.py`."""

from secvit_jax import train

if __name__ == '__main__':
  train.run()
