"""Models for the experiments: encoder and decoder with nmattn attention."""
