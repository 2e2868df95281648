"""`llmserve chat`: a terminal chat over the public OpenAI API only (it imports nothing
from serving/ or engines/), so it talks to llmserve or any OpenAI-compatible server."""
