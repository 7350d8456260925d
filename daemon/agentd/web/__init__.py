"""The HTTP surface: the aiohttp application, its middlewares and its routes."""
