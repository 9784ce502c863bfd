"""The Trio actors (loader, scheduler, pipelines, signals), their messages and supervision."""
