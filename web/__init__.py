"""The HTTP layer in front of the pages: which browser session holds which sign-in (:mod:`web.sessions`) and
the checks every request passes before Streamlit sees it (:mod:`web.guard`), mounted by :mod:`web.asgi`,
the script ``./run.sh`` serves. Streamlit and Starlette live here; the store is reached only through
``storage.service``."""
