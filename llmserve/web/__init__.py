"""The playground: a static chat page (index.html, app.js, style.css) served at /."""
