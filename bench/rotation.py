"""Timed steps that rotate through several inputs, so that no benchmark runs on data
left in the caches by its previous round (the suite's groups cycle through 64 MiB)."""

ROTATE_BYTES = 64 << 20


def copies_for(nbytes: int, least: int = 1, most: int = 64) -> int:
    """How many inputs of `nbytes` make at least ROTATE_BYTES."""
    return max(least, min(most, -(-ROTATE_BYTES // max(nbytes, 1))))


def cycle(inputs, step):
    """A no-argument callable that runs step(*inputs[i]) for i = 0, 1, 2, ... in turn."""
    state = {"i": 0}

    def run():
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        step(*args)

    return run


def forward_backward(fn):
    """step(x, t): loss = fn(x, t), then its backward into a fresh x.grad."""
    def step(x, t):
        x.grad = None
        fn(x, t).backward()

    return step
