"""Drop-in names for code written against other libraries (see gpt3zh.compat.modelscope)."""
