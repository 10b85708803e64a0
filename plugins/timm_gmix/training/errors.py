""" Bad input: one line that says what is wrong and how to fix it. """
import sys


class UsageError(ValueError):
    """ Bad input: train.py prints the message as one line and exits with status 2. """


def reason(error: Exception) -> str:
    """ The first sentence of an exception's message, to quote inside a one-line UsageError. """
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split('. ')[0].rstrip('.')


def main_guard(main):
    """ Run `main`, turning UsageError into one line on stderr and exit status 2. """
    try:
        return main()
    except UsageError as e:
        message = str(e)
        if '\n' in message:
            # Raised in a DataLoader worker (an unreadable image): torch re-raises it in this process with the
            # worker's traceback in the message, whose last line is 'pkg.UsageError: <the one line>'.
            message = message.strip().splitlines()[-1].partition(': ')[2]
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)
