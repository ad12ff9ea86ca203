"""Recipes: whole jobs built on top of the library (the main job). Nothing in centerx's core
(data, model, losses, objectives, engine) imports them."""
