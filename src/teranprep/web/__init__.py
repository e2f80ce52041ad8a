"""The search web app: a FastAPI back end (app.py) and one static page (static/index.html)."""
