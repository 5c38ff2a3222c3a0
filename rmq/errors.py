"""Every error rmq raises, under one root: the public import path (``from rmq.errors import ...``).

They are defined in :mod:`rmq.core.errors`, where every part of rmq can reach them.
"""

from rmq.core.errors import *  # noqa: F403
from rmq.core.errors import __all__  # noqa: F401
