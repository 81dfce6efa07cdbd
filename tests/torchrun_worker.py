"""A torchrun worker for test_train: ``gptfast.train(**OPTIONS_JSON)``, rank 0 alone sending
itself SIGTERM after step STOP (the other ranks must stop with it)."""

import json
import os
import signal
import sys

from gptfast import train


def stop_rank0(step, row):
    if step == int(sys.argv[2]) and os.environ["RANK"] == "0":
        signal.raise_signal(signal.SIGTERM)


train(callback=stop_rank0, **json.loads(sys.argv[1]))
