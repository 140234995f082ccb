"""moecollab: how experts in Mixture-of-Experts language models collaborate, and how that
knowledge can prune them (a reproduction of Tang et al., arXiv:2504.12359)."""

__version__ = "0.1.0"
