"""The echo example: ``netpool echo`` serves :func:`handler.echo`."""
