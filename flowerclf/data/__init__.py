"""Photos in: folders and splits, reading images, the transforms, and the loaders that batch them."""
