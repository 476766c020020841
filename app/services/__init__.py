"""The API's domain logic, below the routes: checking requests against the database and the model library,
and the rules of each resource. It raises domain errors (core.errors); app.errors maps them to HTTP."""
