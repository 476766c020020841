"""The inference protocols the service speaks: each module only translates between its wire shapes and the
engine client (serving.client), and all of them name a serving failure with the same status."""
