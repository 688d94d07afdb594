"""The admin HTTP API (JSON, with an OpenAPI document): the console's and ``cairn admin``'s
one door into the core."""
