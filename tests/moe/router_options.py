"""Router options shared by the MoE tests that run every router: values that exercise more than the
defaults (a router missing here runs with its defaults). Read it, never change it in a test."""

OPTIONS = {"topk": {"top_k": 2}, "topp": {"top_p": 0.5}, "soft": {"slots_per_expert": 2}}
