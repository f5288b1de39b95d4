"""The base config that experiment configs build on: `from configs import base; c = base.get_base_config()`.

Every key, with its meaning and default, is defined in replaid_jax/base_config.py
(part of the installed library, which reads the defaults when it evaluates or
samples a saved run). `python launch/train.py --config=configs/base.py` trains it.
"""

from replaid_jax.base_config import get_base_config, get_config  # pylint: disable=unused-import
