"""`python -m gptlab.pretrain` (and `torchrun ... -m gptlab.pretrain`): kept working after pretraining moved to
`gptlab.train.pretrain`, because launch scripts on clusters name this module. New scripts can use either."""

import sys

from gptlab.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
