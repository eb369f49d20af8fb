"""One ml_collections config file per experiment (`get_config()`)."""
