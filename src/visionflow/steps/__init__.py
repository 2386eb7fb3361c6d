"""The pipeline's steps. Each is one plain function; the CLI, the KFP components and the tests
all call these same functions."""
