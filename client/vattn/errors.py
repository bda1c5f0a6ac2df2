"""The typed errors of the vattn API (defined in :mod:`vattn.contract.errors`)."""
from vattn.contract.errors import *  # noqa: F401,F403
from vattn.contract.errors import ERRORS_BY_CODE, __all__  # noqa: F401
