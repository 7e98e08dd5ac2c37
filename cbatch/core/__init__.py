"""Pure core: values, parsers and the policy. No I/O here except reading the site config file.

Nothing in this package imports any other cbatch package.
"""
