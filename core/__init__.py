"""The shared core of the service: settings, the database and its tables, the job lifecycle, the data
directory's layout, the checkpoint registry and the job queue. It imports neither the API nor torch, so the
API, the worker and the command line all stand on it."""
