"""Small shared pieces of the test suite (importable because pytest puts `tests/` on `sys.path`)."""


def redness(prompts, images, **kwargs):
    """Mean red minus mean green/blue: a continuous reward, so the samples of a group practically never tie.

    The shapes reward has a few discrete levels; with groups of 2 both samples can score the same, and then every
    advantage is zero and no weight moves. Tests about gradient flow use this reward so they do not depend on that.
    """
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
