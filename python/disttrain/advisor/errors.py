"""The one exception the advisor raises for anything a user can get wrong."""


class AdvisorInputError(ValueError):
    """Bad input to the advisor: unknown model or GPU, unreachable target,
    malformed CSV or price file. The message is one line and says what to do;
    the CLI prints it and exits with status 2."""
