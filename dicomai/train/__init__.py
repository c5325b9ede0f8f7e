"""Training, evaluation and export of fracture classifiers (extra ``train``: PyTorch).

Nothing here is imported by the node; ``pip install dicomai[train]`` brings what it needs.
"""
