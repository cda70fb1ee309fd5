"""The demo model AutoGLM-Phone-Tiny: ShapesWorld scenes, spoken questions, training and evaluation.

Entry points: ``python -m training.train``, ``python -m training.evaluate``,
``python -m training.make_examples``. The serving path never imports this package.
"""
