"""The shipped recipes, installed as package data (``yochameleon.recipes``).

Nothing to import here: :func:`yochameleon.config.recipe_path` finds a recipe by name, so
``yochameleon train tiny-cpu`` works from a wheel install as well as from this repository.
"""
