"""Model families: each a spec that builds its model for a layout and states its facts."""
