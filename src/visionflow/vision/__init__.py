"""Vision tasks: models, datasets, transforms and the Lightning modules that train them."""
