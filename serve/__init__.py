"""The animation service: an HTTP API over the runtime's Animator (`hyportrait serve`), scaled out on Ray Serve
(`hyportrait serve --ray`), with a web page. Needs the `serve` extra (pip install hyportrait[serve])."""
