"""Tabiji's Policy Decision Point: a pure engine over YAML policy sets written by IT."""
