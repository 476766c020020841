"""Pydantic schemas at the API's edge, one module per resource."""
