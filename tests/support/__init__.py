"""Helpers the tests share (views of real digits, defence plug-ins): imported by tests, never collected as tests."""
