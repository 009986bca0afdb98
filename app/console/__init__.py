"""The browser console: static pages shipped in the package, served with a strict CSP."""
